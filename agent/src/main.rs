use clap::Parser as _;

fn main() {
    let cli = conndrain::cli::Cli::parse();
    conndrain::telemetry::init(cli.log_format());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("conndrain: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(conndrain::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line per problem (e.g. each missing capability), each with our prefix.
            for line in format!("{e:#}").lines() {
                eprintln!("conndrain: {line}");
            }
            1
        }
    };
    // Tasks still running (API connections, drain reports) hold the agent's
    // state; shutting the runtime down drops them, and with the last of them
    // the datapath, whose drop removes clsact filters: unlike tcx links they
    // outlive the process. Bounded, so a stuck task cannot hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    std::process::exit(code);
}
