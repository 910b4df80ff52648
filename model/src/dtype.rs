//! [`DType`]: the one vocabulary of floating-point dtypes, in job files, pipelines and
//! command-line flags alike.

use serde::{Deserialize, Serialize};

/// A floating-point dtype: of a training job's forward and backward passes (`float32`, or
/// `bfloat16` mixed precision), of an evaluation, or of written weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    #[default]
    #[serde(alias = "f32", alias = "fp32")]
    #[cfg_attr(feature = "clap", value(alias = "f32", alias = "fp32"))]
    Float32,
    /// bfloat16: float32's range, 8 bits of mantissa.
    #[serde(alias = "bf16")]
    #[cfg_attr(feature = "clap", value(alias = "bf16"))]
    Bfloat16,
    /// IEEE half precision.
    #[serde(alias = "f16", alias = "fp16", alias = "half")]
    #[cfg_attr(feature = "clap", value(alias = "f16", alias = "fp16", alias = "half"))]
    Float16,
}

impl DType {
    /// The name job files and flags use.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Bfloat16 => "bfloat16",
            DType::Float16 => "float16",
        }
    }

    /// The candle dtype.
    pub fn candle(self) -> candle_core::DType {
        match self {
            DType::Float32 => candle_core::DType::F32,
            DType::Bfloat16 => candle_core::DType::BF16,
            DType::Float16 => candle_core::DType::F16,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;

    /// The serde names and aliases (`float32`, `f32`, `bf16`, `half`, ...).
    fn from_str(s: &str) -> crate::Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| crate::Error::Unsupported(format!("dtype `{s}` (expected float32, bfloat16 or float16)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse_and_others_are_named() {
        for (name, d) in [("float32", DType::Float32), ("fp32", DType::Float32), ("bf16", DType::Bfloat16), ("half", DType::Float16)] {
            assert_eq!(name.parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::Bfloat16.candle(), candle_core::DType::BF16);
        assert!("int8".parse::<DType>().unwrap_err().to_string().contains("dtype `int8`"));
    }
}
