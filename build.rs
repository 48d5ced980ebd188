include!("link_rocksdb.rs");

fn main() {
    println!("cargo:rerun-if-changed=link_rocksdb.rs");
    link_rocksdb_dependencies();
}
