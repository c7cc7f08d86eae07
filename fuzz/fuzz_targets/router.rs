//! The user-side router: path, `X-Server-Name` and host to backend name and target (see
//! `relay_server::user::router::fuzz_check`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_server::user::router::fuzz_check(data));
