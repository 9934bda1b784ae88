/// Maps the FUSE session threads' read buffers as they are allocated (see the module).
#[global_allocator]
static ALLOC: thinlayer::fuse::prefault::SessionBuffers = thinlayer::fuse::prefault::SessionBuffers;

fn main() {
    std::process::exit(thinlayer::cli::main());
}
