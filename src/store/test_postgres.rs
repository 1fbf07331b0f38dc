//! A PostgreSQL for the tests, shared by the library's unit tests and the integration
//! suite (which includes this file by path).

/// `CHATVAULT_TEST_POSTGRES` if set (CI starts one), else one
/// `scripts/postgres-for-tests.sh` starts for this process. None (the test then returns)
/// only where no PostgreSQL can be had, and never under CI.
pub fn postgres_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("CHATVAULT_TEST_POSTGRES") {
            return Some(url);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres-for-tests.sh");
        let out = std::process::Command::new("bash").arg(script).arg(std::process::id().to_string()).output();
        match out {
            Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
                assert!(!ci, "CI must run the PostgreSQL tests: {why}");
                eprintln!("skipping the PostgreSQL tests: {why}");
                None
            }
        }
    })
    .clone()
}
