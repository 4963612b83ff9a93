fn main() -> std::process::ExitCode {
    idaics::cli::run()
}
