//! Module boundaries, checked by reading the sources: the machine does no
//! I/O, reads no clock and never awaits, and the two roles do not import
//! each other.

#[test]
fn the_machine_module_does_no_io_reads_no_clock_and_never_awaits() {
    // Proves the functional-core boundary (ARCHITECTURE.md's first
    // invariant) by reading the
    // module's own source: none of these may appear outside comments.
    let sources = [
        ("mod.rs", include_str!("../mod.rs")),
        ("event.rs", include_str!("../event.rs")),
        ("state.rs", include_str!("../state.rs")),
        ("effect.rs", include_str!("../effect.rs")),
        ("step.rs", include_str!("../step.rs")),
        ("gates.rs", include_str!("../gates.rs")),
    ];
    let forbidden = [
        "tokio",
        "hyper",
        "rusqlite",
        "std::fs",
        "fs_err",
        "std::net",
        "std::process",
        "std::io",
        "std::env",
        "std::thread",
        "SystemTime",
        "Instant",
        "now_utc",
        "now_local",
        "async ",
        ".await",
        "crate::clock",
        "crate::wire",
        "crate::queue",
        "crate::cp",
        "crate::agent",
    ];
    for (file, text) in sources {
        for (line_idx, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                assert!(!code.contains(word), "src/machine/{file}:{} uses {word:?}: {line}", line_idx + 1);
            }
        }
    }
}

/// Every `.rs` file at or under `path`.
fn rust_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).expect("read source dir") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_roles_do_not_import_each_other() {
    // Proves the module boundary between the two roles: the agent never
    // names the control plane, and neither the control plane nor the
    // command-line types name the agent (what both use lives in `client`,
    // `signal`, `output` and `cli`). It walks the directories, so a new file
    // is covered too; comments count, like `grep -rn` would.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules = [("agent", "crate::cp"), ("cp", "crate::agent"), ("cli.rs", "crate::agent"), ("cli", "crate::agent")];
    for (under, word) in rules {
        let files = rust_files(&src.join(under));
        assert!(!files.is_empty(), "no sources under src/{under}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for (line_idx, line) in text.lines().enumerate() {
                assert!(!line.contains(word), "{}:{} uses {word:?}: {line}", file.display(), line_idx + 1);
            }
        }
    }
}
