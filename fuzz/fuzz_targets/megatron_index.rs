#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = btm_trainer::fuzz_targets::megatron_index(data);
});
