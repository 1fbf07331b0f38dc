#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    chatvault::cli::main()
}
