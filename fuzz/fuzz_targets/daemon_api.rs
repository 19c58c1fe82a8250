//! The daemon's JSON API as a client can send it: one request line read
//! under the size cap, the deploy spec's checks, env masking and host
//! rules; and the response line as the CLI reads it.
//!
//! Input: the bytes a client writes on the socket (or, for the CLI's side,
//! the daemon's answer).
//!
//! What must hold: the daemon reads exactly one line, never past its
//! newline; a request it accepts serializes to one line that reads back as
//! the same request; masked env entries keep their key and hide the value;
//! a host rule prints as what parses back to it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use platform::api::{mask_env, read_request, AppStatus, Request, RequestError, Response, MASK};
use vmm_api::net::Rule;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let result = read_request(&mut reader);
    let line_end = data
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |i| i + 1);
    if !matches!(result, Err(RequestError::TooLong)) {
        assert_eq!(reader, &data[line_end..], "read past the request line");
    }
    if let Ok(request) = &result {
        let mut text = serde_json::to_string(request).expect("a request serializes");
        assert!(!text.contains('\n'), "{text}");
        text.push('\n');
        let again = read_request(&mut text.as_bytes()).expect("a serialized request reads");
        assert_eq!(
            serde_json::to_value(&again).expect("serializes"),
            serde_json::to_value(request).expect("serializes"),
        );
        if let Request::Deploy { spec, .. } = request {
            let _ = spec.validate();
            let _ = spec.network();
            let masked = mask_env(&spec.env);
            assert_eq!(masked.len(), spec.env.len());
            for (entry, shown) in spec.env.iter().zip(&masked) {
                let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
                assert_eq!(*shown, format!("{key}={MASK}"));
            }
            for rule in &spec.allow_host {
                let printed = rule.to_string();
                assert_eq!(printed.parse::<Rule>().as_ref(), Ok(rule), "{printed}");
            }
        }
    }

    // The CLI's side: the daemon's answer, and `ps` data in it.
    if let Ok(response) = serde_json::from_slice::<Response>(data) {
        let text = serde_json::to_string(&response).expect("a response serializes");
        let again: Response = serde_json::from_str(&text).expect("a serialized response reads");
        assert_eq!(again.ok, response.ok);
        assert_eq!(again.error, response.error);
        let _ = serde_json::from_value::<Vec<AppStatus>>(response.data);
    }
});
