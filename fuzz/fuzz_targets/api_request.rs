//! HTTP API request parsing: the input is `METHOD PATH[?QUERY]\nBODY`; parsing never
//! panics and answers a request or a documented error.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, target) = head.split_once(' ').unwrap_or(("POST", &head));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if let Err(e) = gateway::api::parse(&method, path, query, body) {
        assert!(matches!(e.code.code(), 102 | 104 | 110), "{e:?}");
    }
});
