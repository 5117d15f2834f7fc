//! `migrate`: inspect, verify and convert checkpoints.
//!
//! The command line is the library's (`ckptkit::cli`, cargo feature `cli`,
//! on by default); this binary is its entry point and nothing else.

fn main() -> std::process::ExitCode {
    ckptkit::cli::main()
}
