//! The handoff decoder on arbitrary bytes: it never panics, and whatever it accepts encodes
//! back to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringflip::__fuzz::decode_and_reencode(data);
});
