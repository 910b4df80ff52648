#![no_main]
// btm catches the panics the tokenizers crate raises on some malformed files (see
// btm_model::tokenizer::from_bytes); libfuzzer-sys's hook would abort on them even when caught,
// so the default hook is restored. A panic btm does not catch still aborts the run.
libfuzzer_sys::fuzz_target!(init: drop(std::panic::take_hook()), |data: &[u8]| {
    let _ = btm_model::fuzz_targets::tokenizer_json(data);
});
