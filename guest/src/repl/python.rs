//! Python sessions: `python3 -u -c <BOOTSTRAP> <driver.py>` (unbuffered
//! stdio; the bootstrap compiles the driver under the name `<moat-driver>`,
//! so its frames can be told from the user's, even from code the user runs
//! with `exec`, which shows as `<string>`). Cells are
//! compiled with `compile(code, "<cell>", "exec")` (top-level `await` allowed
//! on 3.8+) and run in a persistent `__main__` namespace; exceptions print a
//! traceback without the driver's frames; SIGINT raises `KeyboardInterrupt`
//! only while a cell runs.

use super::Flavor;

/// Runs the driver given as the first argument, named `<moat-driver>`.
const BOOTSTRAP: &str = "import sys; exec(compile(sys.argv[1], '<moat-driver>', 'exec'))";

/// The Python flavor.
pub static PYTHON: Flavor = Flavor {
    name: "python",
    programs: &["python3"],
    args: &["-u", "-c", BOOTSTRAP],
    driver: include_str!("driver.py"),
    missing: "python3 is not installed in this sandbox's image; use an image with Python \
              (e.g. microsandbox/python)",
};
