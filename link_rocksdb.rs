// Included by the build scripts of the crates whose binaries and tests link RocksDB.
//
// With `ROCKSDB_STATIC` (set in .cargo/config.toml), librocksdb-sys links Debian's static
// `librocksdb.a`, which refers to the compression libraries RocksDB was built with. They
// must come after the archive on the linker's command line, and link arguments go at its
// end; a `rustc-link-lib` from this crate would come before the archive and be dropped.
fn link_rocksdb_dependencies() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        for lib in ["snappy", "lz4", "zstd", "bz2", "z"] {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
    }
}
