fn main() {
    std::process::exit(thinlayer::cli::main());
}
