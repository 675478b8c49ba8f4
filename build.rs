//! Generates the parser from grammar/pdg.lalrpop and the ONNX protobuf messages from
//! proto/onnx.proto into OUT_DIR (nothing generated is committed). The .proto file is
//! compiled by protox, in Rust, so building needs no `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=grammar/pdg.lalrpop");
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    lalrpop::Configuration::new()
        .set_in_dir("grammar")
        .set_out_dir(&out)
        .process()
        .expect("grammar/pdg.lalrpop must be a valid lalrpop grammar");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"]).expect("proto/onnx.proto must compile");
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(descriptors)
        .expect("prost-build generates code for proto/onnx.proto");
}
