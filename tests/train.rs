//! The training loop on a tiny synthetic task: checkpoint + resume equals the uninterrupted
//! run bit for bit, checkpoints with other settings or torn files are refused, ε follows the
//! accountant, the non-private baseline learns; and `pdgc train` end to end on IDX files.

mod common;

use common::pdgc;

use std::io::Write;
use std::path::Path;

use tempfile::TempDir;

use pdgc::data::Dataset;
use pdgc::privacy::Accountant;
use pdgc::train::{self, EpochReport, Privacy, TrainConfig, Trainer};
use pdgc::{CompileOptions, Error, Module, Optimizer, Sampling};

const TINY: &str = "
model tiny {
    input x: [1, 6, 6];
    label y: classes(10);
    h = tanh(conv: conv2d(x, 4, kernel=3));
    logits = fc: linear(flatten(h), 10);
    loss cross_entropy(logits, y);
}
";

fn tiny(batch: usize) -> Module {
    Module::from_source("tiny.pdg", TINY, &CompileOptions::new(batch)).expect("compiles")
}

/// A fresh, empty directory under the system's temp dir, removed with its contents when
/// dropped.
fn tmp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("pdgc-train-{name}-")).tempdir().expect("temp dir")
}

/// Class `c` lights pixel `3c + 1` of a 6x6 image, over a faint deterministic texture.
fn task(n: usize, offset: usize) -> Dataset {
    let mut images = Vec::with_capacity(n * 36);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i * 7 + offset) % 10;
        for k in 0..36 {
            let texture = (((i + offset) * 31 + k * 17) % 13) as f32 / 13.0 - 0.5;
            images.push(if k == 3 * c + 1 { 2.5 } else { 0.3 * texture });
        }
        labels.push(c as i64);
    }
    Dataset { images, labels, rows: 6, cols: 6 }
}

fn config(epochs: u64, optimizer: Optimizer, privacy: Privacy) -> TrainConfig {
    TrainConfig { epochs, sampling: Sampling::Poisson { rate: 0.25 }, optimizer, privacy, seed: 77, micro_batch: 8 }
}

const PRIVATE: Privacy =
    Privacy::Private { clip: 1.0, noise_multiplier: 0.8, delta: 1e-5, accountant: Accountant::Pld };

/// [`PRIVATE`] accounted with RDP.
const PRIVATE_RDP: Privacy =
    Privacy::Private { clip: 1.0, noise_multiplier: 0.8, delta: 1e-5, accountant: Accountant::Rdp };

#[test]
fn resuming_from_a_checkpoint_reproduces_the_uninterrupted_run() {
    let module = tiny(8);
    let (train, test) = (task(48, 0), task(20, 3));
    for (name, opt) in [("momentum", Optimizer::Sgd { lr: 0.2, momentum: 0.9 }), ("adam", Optimizer::adam(0.05))] {
        let whole_dir = tmp_dir(&format!("whole-{name}"));
        let mut whole = Trainer::new(&module, config(3, opt, PRIVATE), &train).expect("trainer");
        let whole_summary = whole.run(&train, &test, Some(whole_dir.path()), |_| {}).expect("run");

        let part_dir = tmp_dir(&format!("part-{name}"));
        let mut first = Trainer::new(&module, config(1, opt, PRIVATE), &train).expect("trainer");
        first.run(&train, &test, Some(part_dir.path()), |_| {}).expect("epoch 1");
        let mut rest = Trainer::resume(&module, config(3, opt, PRIVATE), &train, part_dir.path()).expect("resume");
        assert_eq!((rest.epochs_done, rest.steps_done), (1, 4));
        let rest_summary = rest.run(&train, &test, Some(part_dir.path()), |_| {}).expect("epochs 2-3");

        assert_eq!(rest.params, whole.params, "{name}: parameters bit for bit");
        assert_eq!(rest.opt_state, whole.opt_state, "{name}: optimizer state");
        assert_eq!(rest.steps_done, whole.steps_done);
        assert_eq!(rest_summary.test_accuracy, whole_summary.test_accuracy);
        assert_eq!(rest_summary.epsilon, whole_summary.epsilon);
        // The whole history, the part read back from state.json included (floats round-trip;
        // the first part was run as a 1-epoch run).
        let history = |t: &Trainer| {
            t.history.iter().map(|r| EpochReport { seconds: 0.0, epochs: 3, ..r.clone() }).collect::<Vec<_>>()
        };
        assert_eq!(history(&rest), history(&whole), "{name}: per-epoch history");
        // And the parameters on disk are the same too (the optimizer file's metadata is a
        // hash map, so its bytes may be ordered differently; its contents were compared above).
        let a = std::fs::read(whole_dir.path().join("params.safetensors")).expect("read");
        let b = std::fs::read(part_dir.path().join("params.safetensors")).expect("read");
        assert!(a == b, "{name}: params.safetensors differs");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let module = tiny(8);
    let (train, test) = (task(48, 0), task(10, 3));
    let run = |threads: usize| {
        let mut t = Trainer::new(&module, config(2, Optimizer::Sgd { lr: 0.2, momentum: 0.9 }, PRIVATE), &train)
            .expect("trainer");
        t.set_threads(threads);
        t.run(&train, &test, None, |_| {}).expect("run");
        t.params
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn resume_refuses_other_settings_and_torn_checkpoints() {
    let module = tiny(8);
    let (train, test) = (task(32, 0), task(10, 3));
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
    let dir = tmp_dir("refuse");
    let mut t = Trainer::new(&module, config(1, opt, PRIVATE), &train).expect("trainer");
    t.run(&train, &test, Some(dir.path()), |_| {}).expect("run");

    let other = Privacy::Private { clip: 0.5, noise_multiplier: 0.8, delta: 1e-5, accountant: Accountant::Pld };
    let err = Trainer::resume(&module, config(2, opt, other), &train, dir.path()).err().expect("other clip");
    assert!(matches!(err, Error::Checkpoint { .. }) && err.to_string().contains("privacy"), "{err}");
    let err = Trainer::resume(&module, config(2, Optimizer::adam(0.1), PRIVATE), &train, dir.path())
        .err()
        .expect("other opt");
    assert!(err.to_string().contains("optimizer"), "{err}");
    let err = Trainer::resume(&tiny(4), TrainConfig { micro_batch: 4, ..config(2, opt, PRIVATE) }, &train, dir.path())
        .err()
        .expect("other module");
    assert!(
        err.to_string().contains("another model or micro-batch") || err.to_string().contains("micro_batch"),
        "{err}"
    );
    let err = Trainer::resume(&module, config(2, opt, PRIVATE), &task(31, 0), dir.path()).err().expect("other data");
    assert!(err.to_string().contains("32 training examples"), "{err}");

    // A torn checkpoint: state.json from epoch 1, parameters from a later epoch.
    let mut later = Trainer::resume(&module, config(2, opt, PRIVATE), &train, dir.path()).expect("resume");
    later.run(&train, &test, None, |_| {}).expect("epoch 2");
    let other_dir = tmp_dir("refuse-later");
    later.save_checkpoint(other_dir.path(), train.len()).expect("save");
    std::fs::copy(other_dir.path().join("params.safetensors"), dir.path().join("params.safetensors")).expect("copy");
    let err = Trainer::resume(&module, config(2, opt, PRIVATE), &train, dir.path()).err().expect("torn");
    assert!(err.to_string().contains("torn checkpoint"), "{err}");

    let err = Trainer::resume(&module, config(2, opt, PRIVATE), &train, tmp_dir("none").path()).err().expect("no dir");
    assert!(matches!(err, Error::Read { .. }), "{err}");
}

#[test]
fn resume_refuses_another_accountant_and_reads_old_checkpoints_as_rdp() {
    let module = tiny(8);
    let (train, test) = (task(32, 0), task(10, 3));
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
    let dir = tmp_dir("accountant");
    let mut t = Trainer::new(&module, config(1, opt, PRIVATE), &train).expect("trainer");
    t.run(&train, &test, Some(dir.path()), |_| {}).expect("run");
    let state = std::fs::read_to_string(dir.path().join("state.json")).expect("state.json");
    assert!(state.contains("\"accountant\": \"pld\""), "the checkpoint records the accountant:\n{state}");
    let err =
        Trainer::resume(&module, config(2, opt, PRIVATE_RDP), &train, dir.path()).err().expect("other accountant");
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("accounted with pld, this run asks for rdp"), "{message}");
    assert!(message.contains("--accountant pld"), "{message}");
    Trainer::resume(&module, config(2, opt, PRIVATE), &train, dir.path()).expect("same accountant");

    // A checkpoint from before the choice existed has no `accountant`: it was RDP.
    let mut old: serde_json::Value = serde_json::from_str(&state).expect("JSON");
    let private = old["config"]["privacy"]["private"].as_object_mut().expect("a private run");
    assert!(private.remove("accountant").is_some());
    let old = serde_json::to_string_pretty(&old).expect("JSON");
    std::fs::write(dir.path().join("state.json"), &old).expect("write");
    let err = Trainer::resume(&module, config(2, opt, PRIVATE), &train, dir.path()).err().expect("old checkpoint, PLD");
    assert!(err.to_string().contains("accounted with rdp, this run asks for pld"), "{err}\n{old}");
    let resumed =
        Trainer::resume(&module, config(2, opt, PRIVATE_RDP), &train, dir.path()).expect("old checkpoint, RDP");
    assert_eq!(resumed.epochs_done, 1);
}

#[test]
fn epsilon_after_each_epoch_is_the_accountants() {
    let module = tiny(8);
    let (train, test) = (task(40, 0), task(10, 3));
    let mut t =
        Trainer::new(&module, config(3, Optimizer::Sgd { lr: 0.1, momentum: 0.0 }, PRIVATE), &train).expect("trainer");
    let mut seen = Vec::new();
    let summary = t.run(&train, &test, None, |r| seen.push((r.steps, r.epsilon))).expect("run");
    assert_eq!(seen.len(), 3);
    for (steps, eps) in &seen {
        let want = pdgc::pld::epsilon(0.8, 0.25, *steps, 1e-5).expect("accountant");
        assert_eq!(*eps, Some(want));
    }
    assert!(seen[0].1 < seen[1].1 && seen[1].1 < seen[2].1, "ε grows: {seen:?}");
    assert_eq!(summary.epsilon, seen[2].1);
    assert_eq!((summary.accountant, summary.best_order), (Some(Accountant::Pld), None));
    assert!(summary.to_string().contains("(PLD)"), "{summary}");

    // The same run accounted with RDP: Opacus' numbers, larger.
    let mut t = Trainer::new(&module, config(3, Optimizer::Sgd { lr: 0.1, momentum: 0.0 }, PRIVATE_RDP), &train)
        .expect("trainer");
    let rdp = t.run(&train, &test, None, |_| {}).expect("run");
    let want = pdgc::privacy::epsilon(0.8, 0.25, 12, 1e-5).expect("accountant");
    assert_eq!((rdp.epsilon, rdp.best_order), (Some(want.epsilon), Some(want.best_order)));
    assert!(want.epsilon > summary.epsilon.expect("ε"), "PLD is tighter than RDP");

    // --epsilon: the σ each accountant picks spends at most that ε over the whole run, and
    // PLD needs less noise for it.
    let sampling = Sampling::Poisson { rate: 0.25 };
    let sigma = train::noise_for_epsilon(4.0, &sampling, 40, 3, 1e-5, Accountant::Rdp).expect("σ");
    let spent = pdgc::privacy::epsilon(sigma, 0.25, 12, 1e-5).expect("ε").epsilon;
    assert!(spent <= 4.0 && spent > 4.0 - 0.01, "σ = {sigma} spends ε = {spent}");
    let pld_sigma = train::noise_for_epsilon(4.0, &sampling, 40, 3, 1e-5, Accountant::Pld).expect("σ");
    let spent = pdgc::pld::epsilon(pld_sigma, 0.25, 12, 1e-5).expect("ε");
    let less = pdgc::pld::epsilon(pld_sigma - pdgc::pld::SIGMA_TOLERANCE, 0.25, 12, 1e-5).expect("ε");
    assert!(spent <= 4.0 && less > 4.0, "σ = {pld_sigma} spends ε = {spent}, σ − tolerance {less}");
    assert!(pld_sigma < sigma, "PLD σ {pld_sigma} vs RDP σ {sigma}");
}

#[test]
fn the_non_private_baseline_learns_the_task() {
    let module = tiny(16);
    let (train, test) = (task(200, 0), task(50, 5));
    let mut cfg = config(8, Optimizer::adam(0.05), Privacy::NonPrivate);
    cfg.micro_batch = 16;
    let mut t = Trainer::new(&module, cfg, &train).expect("trainer");
    let (before, _) = t.evaluate(&test).expect("eval");
    let summary = t.run(&train, &test, None, |_| {}).expect("run");
    assert!(before < 0.4, "chance level before training: {before}");
    assert!(summary.test_accuracy > 0.9, "accuracy {}", summary.test_accuracy);
    assert_eq!(summary.epsilon, None);
    assert!(t.history.iter().all(|r| r.epsilon.is_none()));
}

#[test]
fn bad_training_settings_are_typed_errors() {
    let module = tiny(8);
    let train = task(16, 0);
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
    let bad = [
        config(0, opt, PRIVATE),
        config(1, opt, Privacy::Private { clip: 1.0, noise_multiplier: 0.0, delta: 1e-5, accountant: Accountant::Pld }),
        config(1, opt, Privacy::Private { clip: 1.0, noise_multiplier: 1.0, delta: 1.5, accountant: Accountant::Pld }),
        config(
            1,
            opt,
            Privacy::Private { clip: -1.0, noise_multiplier: 1.0, delta: 1e-5, accountant: Accountant::Rdp },
        ),
        TrainConfig { sampling: Sampling::Poisson { rate: 0.0 }, ..config(1, opt, PRIVATE) },
        config(1, Optimizer::Sgd { lr: 0.0, momentum: 0.0 }, PRIVATE),
    ];
    for cfg in bad {
        let err = Trainer::new(&module, cfg.clone(), &train).err().expect("refused");
        assert!(matches!(err, Error::InvalidSetting { .. } | Error::BadClipNorm(_)), "{cfg:?}: {err}");
    }
}

// ---- the command line ----

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&out).expect("gzip");
    gz.finish().expect("gzip")
}

/// A Fashion-MNIST-shaped directory of `n` training and `n/2` test images.
fn fashion_dir(name: &str, n: usize) -> TempDir {
    let dir = tmp_dir(name);
    std::fs::create_dir_all(dir.path()).expect("dir");
    for (prefix, count) in [("train", n), ("t10k", n / 2)] {
        let pixels: Vec<u8> = (0..count * 784).map(|k| ((k / 784 % 10) * 25 + k % 7) as u8).collect();
        let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
        let images = idx(0x803, &[count as u32, 28, 28], &pixels);
        std::fs::write(dir.path().join(format!("{prefix}-images-idx3-ubyte.gz")), images).expect("write");
        std::fs::write(dir.path().join(format!("{prefix}-labels-idx1-ubyte.gz")), idx(0x801, &[count as u32], &labels))
            .expect("write");
    }
    dir
}

fn data_arg(dir: &Path) -> String {
    format!("fashion-mnist:{}", dir.display())
}

#[test]
fn pdgc_train_runs_private_and_non_private_and_resumes() {
    let dir = fashion_dir("cli", 40);
    let data = data_arg(dir.path());
    let ckpt = tmp_dir("cli-ckpt");
    let common = ["train", "samples/mnist_cnn.pdg", "--data", &data, "--batch", "10", "--micro-batch", "8"];
    let private = ["--clip", "1.0", "--noise", "1.1", "--seed", "3", "--momentum", "0.5", "--lr", "0.05"];

    let mut args: Vec<&str> = common.to_vec();
    args.extend(private);
    args.extend(["--epochs", "2"]);
    let (code, whole, stderr) = pdgc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(whole.contains("epoch 1/2: test accuracy"), "{whole}");
    assert!(whole.contains("ε = ") && whole.contains("δ = 1e-5"), "{whole}");
    assert!(whole.lines().last().unwrap_or("").starts_with("final: test accuracy"), "{whole}");

    let ckpt_s = ckpt.path().display().to_string();
    let mut args: Vec<&str> = common.to_vec();
    args.extend(private);
    args.extend(["--epochs", "1", "--checkpoint", &ckpt_s]);
    let (code, _, stderr) = pdgc(&args);
    assert_eq!(code, 0, "{stderr}");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(private);
    args.extend(["--epochs", "2", "--resume", &ckpt_s]);
    let (code, resumed, stderr) = pdgc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resuming after epoch 1"), "{stderr}");
    let line = |s: &str, p: &str| {
        s.lines().find(|l| l.starts_with(p)).map(|l| l.rsplit_once(", ").expect("time").0.to_string())
    };
    assert_eq!(line(&resumed, "epoch 2/2"), line(&whole, "epoch 2/2"), "{resumed}\n{whole}");

    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--non-private", "--epochs", "1", "--adam", "--lr", "0.01"]);
    let (code, out, stderr) = pdgc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("ε = ∞ (non-private)"), "{out}");
}

#[test]
fn pdgc_train_explains_missing_data_and_bad_flags() {
    let (code, _, stderr) = pdgc(&[
        "train",
        "samples/mnist_cnn.pdg",
        "--data",
        "fashion-mnist:/nonexistent",
        "--clip",
        "1",
        "--noise",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("apt-get install dataset-fashion-mnist"), "{stderr}");

    let dir = fashion_dir("cli-bad", 20);
    let data = data_arg(dir.path());
    let (code, _, stderr) = pdgc(&["train", "samples/mnist_cnn.pdg", "--data", &data, "--noise", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--clip C is required"), "{stderr}");
    let (code, _, stderr) = pdgc(&["train", "samples/mnist_cnn.pdg", "--data", &data, "--clip", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--noise σ or --epsilon ε is required"), "{stderr}");
    let (code, _, stderr) = pdgc(&["train", "samples/mnist_cnn.pdg", "--data", &data, "--non-private", "--clip", "1"]);
    assert_eq!(code, 2, "clap refuses the combination: {stderr}");
    let (code, _, stderr) =
        pdgc(&["train", "samples/mnist_cnn.pdg", "--data", &data, "--sample-rate", "2", "--clip", "1", "--noise", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--sample-rate 2: must be in (0, 1]"), "{stderr}");
    let (code, _, stderr) = pdgc(&["train", "samples/mnist_cnn.pdg", "--data", "mnist", "--clip", "1", "--noise", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("expected `fashion-mnist`"), "{stderr}");
}
