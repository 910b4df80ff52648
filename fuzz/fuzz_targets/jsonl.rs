#![no_main]
// The first byte picks the decompression, as the source's extension would.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = btm_model::fuzz_targets::jsonl_input(data);
});
