use clap::Parser as _;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let cli = conndrain::cli::Cli::parse();
    // Logs go to stderr so that `-o json` output stays clean.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("CONNDRAIN_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = match conndrain::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // One line per problem (e.g. each missing capability), each with our prefix.
            for line in format!("{e:#}").lines() {
                eprintln!("conndrain: {line}");
            }
            1
        }
    };
    std::process::exit(code);
}
