#![no_main]

mod counting_allocator;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::data_decoder(data));
