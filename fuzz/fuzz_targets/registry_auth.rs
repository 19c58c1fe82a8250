//! What a registry says that decides where credentials go: the
//! parameters of its `WWW-Authenticate` challenge, whether a token realm
//! may be sent the registry's credentials, and image references.
//!
//! Input: text; split at NUL bytes it also gives parameter values (the
//! first is a realm URL and a reference) and its first byte picks how the
//! parameters are written.
//!
//! What must hold: any challenge parses; parameters written as a registry
//! writes them (quoted with escapes, or bare tokens) parse back to the same
//! pairs; credentials go to a plain-HTTP realm only when the host ureq
//! would connect to is the registry's own; a reference prints as a string
//! that parses back to the same reference.

#![no_main]

use std::sync::OnceLock;

use image_tools::registry::challenge::{params, realm_may_get_credentials};
use image_tools::registry::Reference;
use libfuzzer_sys::fuzz_target;

/// Repository base URLs of registries as the client builds them.
const BASES: [&str; 5] = [
    "http://127.0.0.1:5000/v2/app",
    "http://localhost:5000/v2/a/b",
    "http://[::1]:5000/v2/app",
    "http://registry.example/v2/x",
    "https://registry-1.docker.io/v2/library/redis",
];

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(ureq::Agent::new)
}

/// The scheme and host ureq would connect to for `url`, if it would.
fn ureq_target(url: &str) -> Option<(String, String)> {
    let parsed = agent().get(url).request_url().ok()?;
    Some((parsed.scheme().to_owned(), parsed.host().to_owned()))
}

fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:/+".contains(&b))
}

fn quoted(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&style, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    let fields = String::from_utf8_lossy(rest);

    // Any challenge parses; keys come trimmed and without `=`.
    for (key, _) in params(&text) {
        assert!(!key.contains('='), "{key:?}");
        assert_eq!(key.trim(), key);
    }

    // Parameters as a registry writes them parse back to the same pairs.
    let keys = ["realm", "service", "scope", "error", "x"];
    let pairs: Vec<(String, String)> = keys
        .iter()
        .zip(fields.split('\0'))
        .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
        .collect();
    let separator = if style & 1 == 0 { "," } else { ", " };
    let written: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            if style & 2 != 0 && is_token(v) {
                format!("{k}={v}")
            } else {
                format!("{k}={}", quoted(v))
            }
        })
        .collect();
    let challenge = written.join(separator);
    assert_eq!(params(&challenge), pairs, "{challenge:?}");

    // Credentials never go over plain HTTP to another host than the
    // registry's, whatever the realm URL looks like.
    let realm = pairs.first().map_or("", |(_, v)| v.as_str());
    for base in BASES {
        if !realm_may_get_credentials(realm, base) {
            continue;
        }
        let Some((scheme, host)) = ureq_target(realm) else {
            continue;
        };
        if scheme != "https" {
            let registry = ureq_target(base).expect("a valid base").1;
            assert_eq!(
                (scheme.as_str(), host.as_str()),
                ("http", registry.as_str()),
                "realm {realm:?} gets the credentials of {base}"
            );
        }
    }

    // A reference prints as what parses back to it.
    if let Ok(reference) = Reference::parse(realm) {
        let printed = reference.to_string();
        let again = Reference::parse(&printed).expect("a printed reference parses");
        assert_eq!(again, reference, "{realm:?} printed as {printed:?}");
    }
});
