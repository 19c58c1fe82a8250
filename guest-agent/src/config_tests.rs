use super::*;

fn parse(text: &[u8]) -> Result<Config, ConfigError> {
    Config::parse(text)
}

#[test]
fn full_file_parses_every_key() {
    let c = parse(
        b"# entrypoint\n\
          arg=/bin/busybox\n\
          arg=sh\n\
          arg=-c\n\
          arg=echo hi; exit 3\n\
          \n\
          env=PATH=/bin\n\
          env=EMPTY=\n\
          cwd=/srv\n\
          uid=1000\n\
          gid=100\n\
          groups=10,20,4294967294\n\
          hostname=box-1\n\
          verbose=1\n\
          stop_grace_ms=250\n",
    )
    .unwrap();
    assert_eq!(
        c.args,
        [&b"/bin/busybox"[..], b"sh", b"-c", b"echo hi; exit 3"]
    );
    assert_eq!(c.env, [&b"PATH=/bin"[..], b"EMPTY="]);
    assert_eq!(c.cwd, b"/srv");
    assert_eq!((c.uid, c.gid), (1000, 100));
    assert_eq!(c.groups, [10, 20, 4_294_967_294]);
    assert_eq!(c.hostname, b"box-1");
    assert!(c.verbose);
    assert_eq!(c.stop_grace_ms, 250);
}

#[test]
fn defaults_apply_and_last_line_needs_no_newline() {
    let c = parse(b"arg=/init2").unwrap();
    assert_eq!(c.args, [b"/init2"]);
    assert!(c.env.is_empty());
    assert_eq!(c.cwd, b"/");
    assert_eq!((c.uid, c.gid), (0, 0));
    assert!(c.groups.is_empty());
    assert_eq!(c.hostname, b"little");
    assert!(!c.verbose);
    assert_eq!(c.stop_grace_ms, 1000);
}

#[test]
fn values_keep_spaces_equals_and_non_utf8_bytes() {
    let c = parse(b"arg= a=b \xff\xfe\narg=\n").unwrap();
    assert_eq!(c.args, [&b" a=b \xff\xfe"[..], b""]);
}

#[test]
fn escapes_decode() {
    let c = parse(b"arg=a\\nb\\tc\\\\d\\re\\x41\\x7f\\xFF\n").unwrap();
    assert_eq!(c.args[0], b"a\nb\tc\\d\reA\x7f\xff");
}

#[test]
fn bad_escapes_are_rejected_with_their_line() {
    for bad in [
        &b"arg=x\\q"[..],
        b"arg=x\\",
        b"arg=\\x4",
        b"arg=\\xg0",
        b"arg=\\x",
    ] {
        let mut text = b"# c\n".to_vec();
        text.extend_from_slice(bad);
        assert_eq!(
            parse(&text),
            Err(ConfigError::BadEscape { line: 2 }),
            "{bad:?}"
        );
    }
}

#[test]
fn nul_bytes_are_rejected_raw_or_escaped() {
    assert_eq!(
        parse(b"arg=a\\x00b\n"),
        Err(ConfigError::NulByte { line: 1 })
    );
    assert_eq!(parse(b"arg=a\0b\n"), Err(ConfigError::NulByte { line: 1 }));
}

#[test]
fn structural_errors() {
    assert_eq!(
        parse(b"arg=/x\njunk\n"),
        Err(ConfigError::MissingEquals { line: 2 })
    );
    assert_eq!(
        parse(b"arg=/x\n arg=/y\n"),
        Err(ConfigError::UnknownKey { line: 2 })
    );
    assert_eq!(
        parse(b"arg=/x\nARG=/y\n"),
        Err(ConfigError::UnknownKey { line: 2 })
    );
    assert_eq!(
        parse(b"arg=/x\nuid=1\nuid=2\n"),
        Err(ConfigError::DuplicateKey { line: 3 })
    );
    assert_eq!(parse(b"# nothing\n\n"), Err(ConfigError::NoArgs));
    assert_eq!(parse(b""), Err(ConfigError::NoArgs));
}

#[test]
fn bad_values_name_their_key() {
    let cases: [(&[u8], &str); 19] = [
        (b"arg=\n", "arg"),
        (b"env=NOEQUALS\n", "env"),
        (b"env==v\n", "env"),
        (b"cwd=relative\n", "cwd"),
        (b"cwd=\n", "cwd"),
        (b"uid=-1\n", "uid"),
        (b"uid=4294967295\n", "uid"),
        (b"uid=4294967296\n", "uid"),
        (b"gid= 1\n", "gid"),
        (b"groups=1,,2\n", "groups"),
        (b"groups=1,x\n", "groups"),
        (b"hostname=\n", "hostname"),
        (b"verbose=yes\n", "verbose"),
        (b"stop_grace_ms=600001\n", "stop_grace_ms"),
        (b"stop_grace_ms=\n", "stop_grace_ms"),
        (b"ready_port=0\n", "ready_port"),
        (b"ready_port=65536\n", "ready_port"),
        (b"ready_port=x\n", "ready_port"),
        (b"uid=\n", "uid"),
    ];
    for (text, key) in cases {
        assert_eq!(
            parse(text),
            Err(ConfigError::BadValue { line: 1, key }),
            "{text:?}"
        );
    }
    let long = [b'h'; MAX_HOSTNAME_LEN + 1];
    let mut text = b"hostname=".to_vec();
    text.extend_from_slice(&long);
    assert_eq!(
        parse(&text),
        Err(ConfigError::BadValue {
            line: 1,
            key: "hostname"
        })
    );
}

#[test]
fn empty_groups_means_none() {
    assert!(parse(b"arg=/x\ngroups=\n").unwrap().groups.is_empty());
}

#[test]
fn limits_are_enforced() {
    let mut big = Vec::new();
    while big.len() <= MAX_FILE_LEN {
        big.extend_from_slice(b"# padding padding padding\n");
    }
    assert_eq!(parse(&big), Err(ConfigError::TooLarge));

    let many_args = b"arg=x\n".repeat(MAX_ARGS + 1);
    assert_eq!(
        parse(&many_args),
        Err(ConfigError::TooMany {
            line: MAX_ARGS + 1,
            key: "arg"
        })
    );
    let mut many_env = b"arg=x\n".to_vec();
    many_env.extend_from_slice(&b"env=A=1\n".repeat(MAX_ENV + 1));
    assert_eq!(
        parse(&many_env),
        Err(ConfigError::TooMany {
            line: MAX_ENV + 2,
            key: "env"
        })
    );
    let mut ready = b"arg=x\n".to_vec();
    ready.extend_from_slice(&b"ready_arg=pg_isready\n".repeat(MAX_READY_ARGS + 1));
    assert_eq!(
        parse(&ready),
        Err(ConfigError::TooMany {
            line: MAX_READY_ARGS + 2,
            key: "ready_arg"
        })
    );
    let mut groups = b"arg=x\ngroups=1".to_vec();
    groups.extend_from_slice(&b",1".repeat(MAX_GROUPS));
    assert_eq!(
        parse(&groups),
        Err(ConfigError::TooMany {
            line: 2,
            key: "groups"
        })
    );
}

#[test]
fn write_to_round_trips_awkward_bytes() {
    let original = Config {
        args: vec![
            b"/bin/x".to_vec(),
            b"a\\b\nc\td\re\x01\x7f\xff=#".to_vec(),
            Vec::new(),
        ],
        env: vec![b"K=v=w".to_vec(), b"E=".to_vec()],
        cwd: b"/a b".to_vec(),
        uid: 7,
        gid: 8,
        groups: vec![1, 2],
        hostname: b"h".to_vec(),
        verbose: true,
        stop_grace_ms: 0,
        ready_port: Some(8080),
        ready_cmd: vec![
            b"/bin/sh".to_vec(),
            b"-c".to_vec(),
            b"pg_isready \\\n-q".to_vec(),
        ],
        volumes: vec![
            Volume::parse(b"vol0:/var/lib/data").unwrap(),
            Volume::parse(b"v-1:/odd path/\xff\n:x").unwrap(),
        ],
    };
    let mut text = String::new();
    original.write_to(&mut text).unwrap();
    assert!(text.is_ascii());
    assert_eq!(parse(text.as_bytes()), Ok(original));
}

#[test]
fn errors_display_as_sentences() {
    assert_eq!(
        ConfigError::BadValue {
            line: 3,
            key: "uid"
        }
        .to_string(),
        "line 3: invalid value for uid"
    );
    assert_eq!(
        ConfigError::TooLarge.to_string(),
        "config file is larger than 65536 bytes"
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: every byte in every position of a short
    // template, plus xorshift noise.
    let template = b"arg=\\x4g\nenv=A=\\\\\ngroups=1,2\n";
    for pos in 0..template.len() {
        for b in 0..=255u8 {
            let mut t = template.to_vec();
            t[pos] = b;
            let _ = parse(&t);
        }
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        let mut t = Vec::new();
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t.push(b"arg=env\\xn1,#\n="[(state % 15) as usize]);
        }
        let _ = parse(&t);
    }
}

#[test]
fn volumes_parse_in_order() {
    let c = parse(
        b"arg=/x\n\
          volume=pg_data-1:/var/lib/postgresql/data\n\
          volume=cache:/srv/a:b\n\
          volume=esc:/with\\x20space\n",
    )
    .unwrap();
    let got: Vec<(&[u8], &[u8])> = c
        .volumes
        .iter()
        .map(|v| (&v.serial[..], &v.path[..]))
        .collect();
    assert_eq!(
        got,
        [
            (&b"pg_data-1"[..], &b"/var/lib/postgresql/data"[..]),
            (b"cache", b"/srv/a:b"),
            (b"esc", b"/with space"),
        ]
    );
    assert!(parse(b"arg=/x\n").unwrap().volumes.is_empty());
}

#[test]
fn bad_volumes_name_their_line() {
    for bad in [
        &b"volume=vol0\n"[..],
        b"volume=\n",
        b"volume=:/data\n",
        b"volume=vol0:\n",
        b"volume=vol0:data\n",
        b"volume=vol0:/\n",
        b"volume=vol0:/a//b\n",
        b"volume=vol0:/a/\n",
        b"volume=vol0:/a/../b\n",
        b"volume=vol0:/a/./b\n",
        b"volume=vol.0:/a\n",
        b"volume=vol0 :/a\n",
        b"volume=abcdefghij0123456789x:/a\n",
    ] {
        let text = [b"arg=/x\n".as_slice(), bad].concat();
        assert_eq!(
            parse(&text),
            Err(ConfigError::BadValue {
                line: 2,
                key: "volume"
            }),
            "{bad:?}"
        );
    }
}

#[test]
fn volumes_may_not_share_a_serial_or_a_path() {
    assert_eq!(
        parse(b"arg=/x\nvolume=a:/d1\nvolume=b:/d2\nvolume=a:/d3\n"),
        Err(ConfigError::DuplicateVolume { line: 4 })
    );
    assert_eq!(
        parse(b"arg=/x\nvolume=a:/d1\n# c\nvolume=b:/d1\n"),
        Err(ConfigError::DuplicateVolume { line: 4 })
    );
    // Nested paths are distinct volumes.
    assert_eq!(
        parse(b"arg=/x\nvolume=a:/d\nvolume=b:/d/e\n")
            .unwrap()
            .volumes
            .len(),
        2
    );
    assert_eq!(
        ConfigError::DuplicateVolume { line: 4 }.to_string(),
        "line 4: volume serial or path given twice"
    );
}

#[test]
fn at_most_sixteen_volumes() {
    let mut text = b"arg=/x\n".to_vec();
    for i in 0..MAX_VOLUMES {
        text.extend_from_slice(format!("volume=v{i}:/data/{i}\n").as_bytes());
    }
    assert_eq!(parse(&text).unwrap().volumes.len(), MAX_VOLUMES);
    text.extend_from_slice(b"volume=last:/data/last\n");
    assert_eq!(
        parse(&text),
        Err(ConfigError::TooMany {
            line: MAX_VOLUMES + 2,
            key: "volume"
        })
    );
}
