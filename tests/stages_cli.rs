//! The per-stage commands (`dnd caption`, `dnd embed`, `dnd generate`) on the tiny
//! fixture checkpoints.

use dnd_tests::{dnd, fixtures};

fn model(name: &str) -> String {
    fixtures().join("multimodal").join(name).display().to_string()
}

fn image(name: &str) -> String {
    fixtures().join("images").join(name).display().to_string()
}

#[test]
fn caption_prints_one_line_per_image() {
    let run = dnd(&[
        "caption",
        "--model",
        &model("blip"),
        "--batch-size",
        "2",
        &image("scene_0.png"),
        &image("scene_1.png"),
        &image("wide.jpg"),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3);
    // The reference captions of tests/fixtures/multimodal/reference/blip.json (32 tokens
    // allowed here, so the first ones must agree).
    assert!(
        lines[0].ends_with("\tover orange over the over photo shape texture magenta"),
        "{}",
        lines[0]
    );
    assert!(lines[2].starts_with(&image("wide.jpg")));
}

#[test]
fn embed_prints_unit_vectors_and_similarities() {
    let run = dnd(&[
        "embed",
        "--model",
        &model("clip"),
        "--image",
        &image("scene_2.png"),
        "--text",
        "a red circle",
        "--text",
        "dots",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rows: Vec<serde_json::Value> =
        run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1 + 2 + 2);
    for row in &rows[..3] {
        let v: Vec<f64> =
            row["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(v.len(), 16);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "embeddings are L2-normalised: {norm}");
    }
    assert_eq!(rows[3]["kind"], "similarity");
}

#[test]
fn generate_writes_one_png_per_seed() {
    let out = tempfile::tempdir().unwrap();
    let summary = out.path().join("summary.json");
    let run = dnd(&[
        "generate",
        "--model",
        &model("sd"),
        "--concept",
        "a red circle",
        "--count",
        "2",
        "--seed",
        "5",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        out.path().to_str().unwrap(),
        "--summary-json",
        summary.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for seed in [5, 6] {
        let png = out.path().join(format!("one-realistic-image-of-a-red-circle-{seed}.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    assert_eq!(s["images"], 2);
    assert_eq!(s["steps"], 4);
}

#[test]
fn stage_commands_reject_bad_input_with_exit_code_2() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["caption".into(), "--model".into(), model("blip"), "/no/such.png".into()],
            "/no/such.png",
        ),
        (
            vec!["caption".into(), "--model".into(), "/no/model".into(), image("gray.png")],
            "/no/model",
        ),
        (vec!["embed".into(), "--model".into(), model("clip")], "--image"),
        (
            vec!["embed".into(), "--model".into(), model("blip"), "--text".into(), "x".into()],
            "does not fit",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model("sd"),
                "--prompt".into(),
                "x".into(),
                "--width".into(),
                "33".into(),
                "--out".into(),
                "/tmp/dnd-never".into(),
            ],
            "divisible",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = dnd(&args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(needle), "{args:?}: `{needle}` missing from {}", run.stderr);
    }
}

#[test]
fn summarize_turns_captions_into_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let captions = dir.path().join("captions.txt");
    std::fs::write(
        &captions,
        "a red circle on a blue background\ntwo red circles and a green square\na picture of a red circle\na small red circle\n",
    )
    .unwrap();
    let exchanges = dir.path().join("exchanges.jsonl");
    let c = captions.to_str().unwrap();
    let run = dnd(&["summarize", "--captions", c, "--exchanges", exchanges.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "red circle");
    let lines = std::fs::read_to_string(&exchanges).unwrap();
    // 4 simplify exchanges + 5 summary rounds, each kept verbatim.
    assert_eq!(lines.lines().count(), 9, "{lines}");

    // An endpoint that cannot be reached is refused before any work, naming the setting.
    let config = dir.path().join("llm.toml");
    std::fs::write(&config, "backend = \"openai\"\n[openai]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\ntimeout_secs = 2\n").unwrap();
    let run = dnd(&["summarize", "--captions", c, "--config", config.to_str().unwrap()]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("127.0.0.1:9"), "{}", run.stderr);
}

#[test]
fn summarize_runs_a_gguf_model_given_with_model() {
    let dir = tempfile::tempdir().unwrap();
    let captions = dir.path().join("captions.txt");
    std::fs::write(&captions, "a red circle on a blue background\na small red circle\n").unwrap();
    let c = captions.to_str().unwrap();
    // The fixture models take 512 positions: shorter prompts than the defaults.
    let config = dir.path().join("llm.toml");
    std::fs::write(
        &config,
        "rounds = 1\n[local]\nmax_new_tokens = 4\n[prompts]\nversion = \"test-short-1\"\nsystem = \"Name the concept.\"\nsimplify = \"Caption: {caption}\\nLabel:\"\nsummarize = \"{labels}\\nLabel:\"\nmerge = \"{labels}\\nOne label:\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let gguf = fixtures().join("gguf").join("qwen2-q4_k_m.gguf");
    let gguf = gguf.to_str().unwrap();
    let exchanges = dir.path().join("exchanges.jsonl");
    let args = [
        "summarize",
        "--captions",
        c,
        "--config",
        config,
        "--backend",
        "local",
        "--model",
        gguf,
        "--exchanges",
        exchanges.to_str().unwrap(),
    ];
    let run = dnd(&args);
    // The model loads and answers; whether a random-weight model's replies hold a usable
    // label depends on its tokens, so "no usable label" (exit 1) is the one other outcome.
    match run.code {
        0 => {
            let lines = std::fs::read_to_string(&exchanges).unwrap();
            assert!(
                lines.contains("<|im_start|>user\\nCaption: a small red circle\\nLabel:<|im_end|>"),
                "{lines}"
            );
            assert!(lines.contains(r#""backend":"local""#), "{lines}");
            assert!(run.stderr.contains(&format!("local:{gguf}@cpu")), "{}", run.stderr);
        }
        1 => assert!(run.stderr.contains("no caption gave a usable label"), "{}", run.stderr),
        code => panic!("exit {code}: {}", run.stderr),
    }

    // Bad input: a file that is not GGUF, and --model with the consensus rule.
    let fake = dir.path().join("model.gguf");
    std::fs::write(&fake, "<html>not found</html>").unwrap();
    let fake = fake.to_str().unwrap();
    let run = dnd(&["summarize", "--captions", c, "--backend", "local", "--model", fake]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(fake) && run.stderr.contains("not a GGUF file"), "{}", run.stderr);
    assert!(run.stderr.contains("expected: a GGUF file"), "{}", run.stderr);
    let run = dnd(&["summarize", "--captions", c, "--model", gguf]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--backend local"), "{}", run.stderr);
}
