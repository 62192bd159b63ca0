//! The layering of `src/lib.rs`'s `# Layout`, checked on the code itself: a
//! top-level module may name (outside comments) only the modules below it,
//! so the arrows between the folders run one way and no circle can form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module of the library and the modules it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("protocol", &[]),
    ("metrics", &[]),
    ("shutdown", &[]),
    ("logging", &[]),
    ("machine", &["protocol"]),
    ("nats", &["protocol", "metrics"]),
    ("client", &["protocol", "nats"]),
    (
        "manager",
        &["protocol", "machine", "nats", "metrics", "shutdown"],
    ),
    ("worker", &["protocol", "nats", "metrics"]),
    (
        "observe",
        &["protocol", "nats", "metrics", "shutdown", "client"],
    ),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .expect("readable source folder")
            .map(|e| e.expect("readable entry").path())
            .collect();
        entries.sort();
        for p in entries {
            rust_files(&p, out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The top-level modules a file names through `crate::`, with the lines.
fn named_modules(text: &str) -> BTreeMap<String, Vec<usize>> {
    let mut found: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.entry(name).or_default().push(n + 1);
            }
        }
    }
    found
}

#[test]
fn modules_use_only_the_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (module, allowed) in ALLOWED {
        let mut files = Vec::new();
        let dir = src.join(module);
        let file = src.join(format!("{module}.rs"));
        rust_files(if dir.is_dir() { &dir } else { &file }, &mut files);
        assert!(!files.is_empty(), "no source for module {module}");
        for f in files {
            checked += 1;
            let text = std::fs::read_to_string(&f).expect("readable source");
            for (used, lines) in named_modules(&text) {
                if used != *module && !allowed.contains(&used.as_str()) {
                    wrong.push(format!(
                        "{} uses crate::{used} (lines {lines:?}); {module} may use only {allowed:?}",
                        f.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} files found under src/");
    assert!(
        wrong.is_empty(),
        "arrows pointing up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_library_module_has_a_place_in_the_layering() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(!declared.is_empty());
    for m in &declared {
        assert!(
            ALLOWED.iter().any(|(name, _)| name == m),
            "module {m} is declared in lib.rs but not placed in ALLOWED"
        );
        assert!(
            lib.contains(&format!("[`{m}`]")),
            "module {m} is missing from lib.rs's # Layout"
        );
    }
    assert_eq!(
        declared.len(),
        ALLOWED.len(),
        "ALLOWED names a module lib.rs lacks"
    );
}

#[test]
fn the_checker_sees_a_use_and_skips_comments() {
    let found = named_modules(
        "use crate::nats::Nats;\n// see crate::observe\n  let x = crate::protocol::now_ms();\n",
    );
    assert_eq!(found.keys().collect::<Vec<_>>(), ["nats", "protocol"]);
    assert_eq!(found["protocol"], [3]);
}
