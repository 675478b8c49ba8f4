//! Generates the parser from grammar/pdg.lalrpop into OUT_DIR (nothing generated is committed).

fn main() {
    println!("cargo:rerun-if-changed=grammar/pdg.lalrpop");
    lalrpop::Configuration::new()
        .set_in_dir("grammar")
        .set_out_dir(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .process()
        .expect("grammar/pdg.lalrpop must be a valid lalrpop grammar");
}
