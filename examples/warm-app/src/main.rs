//! The `warm-app` binary: see the library for what it does.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    warm_app::run_from(std::env::args_os())
}
