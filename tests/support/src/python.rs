//! The Python zygote's virtualenv (`forkd/zygote/python`): made by `scripts/install-deps` at
//! `$SQUALL_PYTHON_VENV` (default `~/.cache/squall/python-venv`) with the pinned requirements
//! of `forkd/zygote/python/tests/requirements.txt` and the `squall-zygote` package installed
//! into it. Tests use its interpreter and the test apps beside the package.

use std::path::{Path, PathBuf};

/// The repository's `forkd/zygote/python`.
pub fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../forkd/zygote/python")
}

/// The apps the tests serve (`forkd/zygote/python/tests/apps`), for `PYTHONPATH`.
pub fn apps_dir() -> PathBuf {
    package_dir().join("tests/apps")
}

/// Where the virtualenv is.
pub fn venv() -> PathBuf {
    match std::env::var_os("SQUALL_PYTHON_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/squall/python-venv")
        }
    }
}

/// The virtualenv's interpreter, once checked to be current: made from the pinned
/// requirements, with the package as it is in this tree. Panics saying to run
/// `scripts/install-deps` otherwise.
pub fn venv_python() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin/python");
    let fix = "run scripts/install-deps to make it";
    assert!(
        python.exists(),
        "no Python virtualenv at {}: {fix}",
        venv.display()
    );
    let pinned = std::fs::read(package_dir().join("tests/requirements.txt")).unwrap();
    let installed = std::fs::read(venv.join("squall-requirements.txt")).unwrap_or_default();
    assert!(
        pinned == installed,
        "the virtualenv at {} has other requirements than forkd/zygote/python/tests/requirements.txt: {fix}",
        venv.display()
    );
    let sources = package_dir().join("src/squall_zygote");
    let site = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .map(|entry| entry.unwrap().path().join("site-packages/squall_zygote"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| {
            panic!(
                "squall-zygote is not installed in {}: {fix}",
                venv.display()
            )
        });
    for entry in std::fs::read_dir(&sources).unwrap() {
        let source = entry.unwrap().path();
        if source.extension().is_some_and(|ext| ext == "py") {
            let copy = site.join(source.file_name().unwrap());
            assert!(
                std::fs::read(&source).ok() == std::fs::read(&copy).ok(),
                "the squall-zygote installed in {} is not this tree's ({} differs): {fix}",
                venv.display(),
                copy.display()
            );
        }
    }
    python
}
