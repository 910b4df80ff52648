#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = btm_model::fuzz_targets::checkpoint(data);
});
