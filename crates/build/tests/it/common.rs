//! A fixture tree copied into a temporary folder, the diffs the tests
//! write against it, and the target binary built from it.

use shadowpatch_build::{build, BuildError, BuildRequest, Built};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    /// The program the tree's Makefile links (and the tree's name).
    pub program: String,
}

impl Fixture {
    /// A copy of `tests/data/calc`.
    pub fn new() -> Fixture {
        Fixture::of("calc")
    }

    /// A copy of `tests/data/<program>`, whose Makefile links `program`.
    pub fn of(program: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join(program);
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(program);
        run(Command::new("cp").arg("-a").arg(&data).arg(&source));
        Fixture {
            dir,
            source,
            program: program.to_string(),
        }
    }

    /// The program built from the pristine tree (as a distribution would
    /// have built it), stripped or not.
    pub fn target_binary(&self, stripped: bool) -> PathBuf {
        self.target_binary_with(stripped, None)
    }

    /// The program built with `cflags` instead of the Makefile's own.
    pub fn target_binary_with(&self, stripped: bool, cflags: Option<&str>) -> PathBuf {
        let tree = self
            .dir
            .path()
            .join(if cflags.is_some() { "shipped-other" } else { "shipped" });
        if !tree.join(&self.program).exists() {
            run(Command::new("cp").arg("-a").arg(&self.source).arg(&tree));
            let mut make = Command::new("make");
            make.arg("-s").current_dir(&tree);
            if let Some(cflags) = cflags {
                make.arg(format!("CFLAGS={cflags}"));
            }
            run(&mut make);
        }
        if !stripped {
            return tree.join(&self.program);
        }
        let out = tree.with_extension("stripped");
        run(Command::new("strip").arg("-o").arg(&out).arg(tree.join(&self.program)));
        out
    }

    /// A diff of `file` with `from` replaced by `to` (which must occur).
    pub fn diff(&self, name: &str, file: &str, from: &str, to: &str) -> PathBuf {
        let original = std::fs::read_to_string(self.source.join(file)).unwrap();
        assert!(original.contains(from), "{from:?} not in {file}");
        let changed = original.replacen(from, to, 1);
        let new_path = self.dir.path().join(format!("{name}.new"));
        std::fs::write(&new_path, changed).unwrap();
        let output = Command::new("diff")
            .args(["-u", "--label", &format!("a/{file}"), "--label", &format!("b/{file}")])
            .arg(self.source.join(file))
            .arg(&new_path)
            .output()
            .unwrap();
        let path = self.dir.path().join(format!("{name}.diff"));
        std::fs::write(&path, output.stdout).unwrap();
        path
    }

    pub fn request(&self, diffs: &[PathBuf], target: &str, out: &str) -> BuildRequest {
        BuildRequest {
            source: self.source.clone(),
            diffs: diffs.to_vec(),
            target: target.to_string(),
            out: self.dir.path().join(out),
            cache: Some(self.dir.path().join("cache")),
            ..BuildRequest::default()
        }
    }

    pub fn build(&self, diffs: &[PathBuf], target: &Path, out: &str) -> Result<Built, BuildError> {
        build(&self.request(diffs, &target.display().to_string(), out), &mut |_, _| {})
    }
}

pub fn run(command: &mut Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?} failed");
}

pub fn names(functions: &[shadowpatch_build::BuiltFunction]) -> Vec<&str> {
    functions.iter().map(|f| f.symbol.as_str()).collect()
}
