fn main() -> anyhow::Result<()> {
    idaics::cli::main()
}
