//! `moat-jailer`: runs one VM process confined. The broker spawns it with a
//! spec on the command line; it runs the fixed sequence in `sequence.rs` and
//! execs the VMM. It never links a VMM. Failures print one line naming the
//! step to stderr (the broker shows it with the console log) and exit 1.

mod error;
mod mounts;
mod privileges;
mod seccomp;
mod sequence;
mod spec;

fn main() {
    let spec = match spec::JailSpec::parse(std::env::args_os().skip(1)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moat-jailer: {e}");
            std::process::exit(2);
        }
    };
    let e = sequence::run(&spec);
    eprintln!("moat-jailer: {e}");
    std::process::exit(1);
}
