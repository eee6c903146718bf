//! Finding the binaries under test: the demo (this package's `demo` binary, which is
//! `coreloop_demo::main`; [`http_binary`]) and the examples users copy
//! ([`example_binary`], built with cargo for the running test's profile), unless an
//! environment variable names them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};

use anyhow::{Context as _, Result, anyhow, bail};

/// Environment variable that, when set, names the demo binary to test instead of this
/// package's `demo` (another build, such as `target/release/coreloop-demo`).
pub const BINARY_ENV: &str = "CORELOOP_HTTP_BIN";

/// Path of the demo HTTP binary: this package's `demo` binary (`src/bin/demo.rs`, whose
/// `main` is `coreloop_demo::main`).
///
/// Cargo builds a package's binaries before its integration tests run, and tells the tests
/// where they are in `CARGO_BIN_EXE_<name>`, at compile time (`env!`, which the tests use
/// for the fixtures) and, under `cargo test` and `cargo nextest run`, in the environment
/// of the test process too; this is library code, so the environment is read. Without it
/// (a test binary run by hand), `demo` is looked for next to the `deps` directory the test
/// binary runs from. Nothing is built here. If [`BINARY_ENV`] is set, that path is used
/// as is: a way to test another build of the demo, such as
/// `target/release/coreloop-demo`.
///
/// # Errors
///
/// When the binary is not where cargo puts it, or [`BINARY_ENV`] names no file.
pub fn http_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_or_build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|msg| anyhow!(msg))
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{BINARY_ENV}={} does not name a file", path.display());
        }
        return Ok(path);
    }
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_demo") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let binary = exe
        .parent()
        .filter(|dir| dir.file_name().is_some_and(|dir| dir == "deps"))
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("demo"))
        .with_context(|| {
            format!(
                "{} is not in a cargo `deps` directory and CARGO_BIN_EXE_demo is not set; \
                 set {BINARY_ENV}",
                exe.display()
            )
        })?;
    if !binary.is_file() {
        bail!(
            "the demo binary {} does not exist: build it with `cargo build -p \
             coreloop-integration-tests --bins`, or set {BINARY_ENV}",
            binary.display()
        );
    }
    Ok(binary)
}

/// Builds example `name` for the profile the running test was built with and returns its
/// path; `override_env` is named in the error when the layout is not cargo's.
///
/// cargo sets variables for test processes (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …) that
/// build scripts may declare `rerun-if-env-changed` on (ring's does): they are removed
/// here, so that a build started from a test is the same build as one from the shell and
/// neither undoes the other.
fn build_example(name: &str, override_env: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let deps = exe
        .parent()
        .filter(|dir| dir.file_name().is_some_and(|dir| dir == "deps"))
        .with_context(|| {
            format!(
                "{} is not in a cargo `deps` directory; set {override_env}",
                exe.display()
            )
        })?;
    let profile_dir = deps.parent().context("the deps directory has no parent")?;
    let binary = profile_dir.join("examples").join(name);
    let profile = profile_dir
        .file_name()
        .and_then(|dir| dir.to_str())
        .context("profile directory name")?;
    let parent = profile_dir
        .parent()
        .context("the profile directory has no parent")?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--workspace",
        "--locked",
        "--example",
        name,
    ]);
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        let set_for_tests = key_text.starts_with("CARGO_PKG_")
            || key_text.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*key_text,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_for_tests {
            command.env_remove(&key);
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    // target/<profile> or, when cross-compiling, target/<triple>/<profile>.
    if parent.join("CACHEDIR.TAG").exists() {
        command.arg("--target-dir").arg(parent);
    } else if let (Some(target_dir), Some(triple)) = (parent.parent(), parent.file_name()) {
        command
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--target")
            .arg(triple);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cargo:?} to build the {name} example"))?;
    if !output.status.success() {
        bail!(
            "`{cargo:?} build --workspace --locked --example {name}` failed ({}); the \
             integration tests need that binary at {}.\n{}",
            output.status,
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if !binary.is_file() {
        bail!(
            "cargo built the {name} example but {} does not exist",
            binary.display()
        );
    }
    Ok(binary)
}

/// Environment variable that, when set, names a directory holding the example binaries
/// (`<dir>/<name>`) for [`example_binary`], and disables its `cargo build`.
pub const EXAMPLES_DIR_ENV: &str = "CORELOOP_EXAMPLES_DIR";

/// Path of the example `name` of the `coreloop-examples` package (`"hyper_auto"`,
/// `"axum"`, `"tls"`, …), built if needed.
///
/// Unlike the demo ([`http_binary`]), an example is not a binary of this package: each is
/// a standalone `main`, the code a user copies, with nothing in a library to call from a
/// thin binary here, and `CARGO_BIN_EXE_*` names only this package's binaries. So the
/// examples are built with cargo, as follows.
///
/// The first call for a name in a process runs `cargo build --workspace --locked
/// --example <name>` for the running test's profile and target directory: it builds a
/// missing binary, rebuilds a stale one, and is a no-op (well under a second) when nothing
/// changed, as after CI's `cargo build --workspace --all-targets`. `--workspace` gives the
/// feature unification of `cargo nextest run --workspace`, so neither rebuilds after the
/// other. If [`EXAMPLES_DIR_ENV`] is set, `<dir>/<name>` is used as is.
///
/// # Errors
///
/// When the layout is not cargo's, or the build fails (cargo's output is included).
pub fn example_binary(name: &str) -> Result<PathBuf> {
    static BUILT: Mutex<BTreeMap<String, Result<PathBuf, String>>> = Mutex::new(BTreeMap::new());
    // Held during the build: a second test thread asking for the same example waits for
    // the first one's result instead of starting cargo again.
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    built
        .entry(name.to_owned())
        .or_insert_with(|| locate_or_build_example(name).map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|msg| anyhow!(msg))
}

fn locate_or_build_example(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(EXAMPLES_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        if !path.is_file() {
            bail!("{EXAMPLES_DIR_ENV}: {} is not a file", path.display());
        }
        return Ok(path);
    }
    build_example(name, EXAMPLES_DIR_ENV)
}
