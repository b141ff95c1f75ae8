use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = roster::cli::Cli::parse();
    if let Err(e) = roster::cli::run(cli).await {
        eprintln!("roster: {e}");
        std::process::exit(1);
    }
}
