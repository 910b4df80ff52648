#![no_main]
// btm catches the panics the parquet crate raises on some corrupt files (see
// btm_trainer::sources); libfuzzer-sys's hook would abort on them even when caught, so the
// default hook is restored. A panic btm does not catch still aborts the run.
libfuzzer_sys::fuzz_target!(init: drop(std::panic::take_hook()), |data: &[u8]| {
    let _ = btm_trainer::fuzz_targets::parquet_source(data);
});
