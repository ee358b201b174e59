//! The HTML report of a dissection, end to end: `dnd dissect` on the tiny fixture job
//! writes it, `dnd report` writes it again elsewhere (a directory and a file:// URL), and
//! headless Chromium drives it (tests/report_browser.py): every neuron listed, filtering
//! by a label word, a neuron page with its top images, crops, candidates and generated
//! images, and no request leaving the local files. Screenshots go to
//! `<target tmp>/report-screenshots/` (and to docs/report-screenshots/ with
//! DND_UPDATE_SCREENSHOTS=1).

use std::path::{Path, PathBuf};

use dnd_store::batches_rows;
use dnd_store::results::{DescriptionRow, ResultTable};
use dnd_tests::{dnd, dnd_in, repo, run_python, table};

fn browser_check(site: &Path, expected: &serde_json::Value) {
    let script = repo().join("tests/report_browser.py");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-screenshots");
    let expected = expected.to_string();
    let args = [site.as_os_str(), shots.as_os_str(), std::ffi::OsStr::new(&expected)];
    let Some(stdout) = run_python("the browser check", &script, &args) else { return };
    eprintln!("browser check: {stdout}screenshots: {}", shots.display());
    for name in ["index.png", "neuron.png"] {
        assert!(shots.join(name).is_file(), "{name} was not written");
        if std::env::var_os("DND_UPDATE_SCREENSHOTS").is_some() {
            let docs = repo().join("docs/report-screenshots");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::copy(shots.join(name), docs.join(name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dissection_report_lists_every_neuron_and_shows_its_evidence_in_a_browser() {
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().display().to_string();
    let job_file = repo().join("tests/fixtures/tiny-job.toml").display().to_string();
    let run =
        dnd_in(&repo(), &["dissect", "--config", &job_file, "--out", &out_s, "--name", "report"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    // dnd dissect ends with the report and says where it is.
    let job_dir = out.path().join("jobs/report");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("report: "))
        .unwrap_or_else(|| panic!("no report line:\n{}", run.stdout));
    assert!(line.contains(&format!("{}/report/index.html", job_dir.display())), "{line}");
    assert!(job_dir.join("report/index.html").is_file());
    assert!(job_dir.join("report/neurons/layer4-0.html").is_file());

    // The labels' evaluation shows in the report: two sortable columns, a section per page.
    let run = dnd_in(&repo(), &["evaluate", job_dir.to_str().unwrap(), "--bootstrap", "10"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);

    // dnd report, to another directory, from where the dissection ran (the probe images'
    // paths in the results are relative to it).
    let site = out.path().join("site");
    let run =
        dnd_in(&repo(), &["report", job_dir.to_str().unwrap(), "--out", site.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("5 neurons") && !run.stdout.contains("could not be read"),
        "{}",
        run.stdout
    );

    // To a URL, from the store root holding a single job, and from another working
    // directory: the job's crops and the cache's generated images are found (they are
    // under the job's ancestors), the probe images, relative to the repository, are not:
    // they show as placeholders and the command says so.
    let url_out = out.path().join("by-url");
    let url = format!("file://{}", url_out.display());
    let run = dnd(&["report", &out_s, "--out", &url]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(url_out.join("index.html").is_file() && url_out.join("neurons/fc-1.html").is_file());
    assert!(
        run.stdout.contains("could not be read") && run.stdout.contains("tests/fixtures/images/"),
        "{}",
        run.stdout
    );
    let page = std::fs::read_to_string(url_out.join("neurons/layer4-0.html")).unwrap();
    assert!(
        page.contains("image missing") && page.contains("../thumbs/"),
        "crops and generated images are there"
    );

    let index = std::fs::read_to_string(site.join("index.html")).unwrap();
    assert!(index.contains("data-key=\"correlation\"") && index.contains("id=\"f-rmax\""));
    let neuron = std::fs::read_to_string(site.join("neurons/layer4-0.html")).unwrap();
    assert!(neuron.contains("id=\"evaluation\"") && neuron.contains("cosy_auc"), "no evaluation");

    // Thumbnails are small; each links to the full image, both named by content.
    for entry in std::fs::read_dir(site.join("thumbs")).unwrap() {
        let path = entry.unwrap().path();
        let img = image::open(&path).unwrap();
        assert!(img.width() <= 128 && img.height() <= 128, "{}", path.display());
    }
    let full = std::fs::read_dir(site.join("images")).unwrap().count();
    assert_eq!(full, std::fs::read_dir(site.join("thumbs")).unwrap().count());

    // The pages load nothing from outside the site.
    for page in ["index.html", "neurons/layer4-0.html", "index.js", "style.css"] {
        let text = std::fs::read_to_string(site.join(page)).unwrap();
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{page} names a remote URL"
        );
    }

    let descriptions: Vec<DescriptionRow> =
        batches_rows("d", &[table(out.path(), "report", ResultTable::Descriptions).await]).unwrap();
    let neurons: Vec<String> =
        descriptions.iter().map(|d| format!("{}:{}", d.layer, d.neuron)).collect();
    assert_eq!(neurons.len(), 5);
    browser_check(&site, &serde_json::json!({ "neurons": neurons, "page": "layer4-0.html" }));
}

#[test]
fn report_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let run = dnd(&["report", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("not a dnd job directory") && run.stderr.contains("no such directory"),
        "{}",
        run.stderr
    );

    let run = dnd(&["report", dir.path().to_str().unwrap()]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("no job.json"), "{}", run.stderr);

    // A job that has not finished: no results.
    let job = dir.path().join("jobs/unfinished");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::write(
        job.join("job.json"),
        r#"["unfinished", {"target": {"model": "m", "layers": ["layer4"]}}]"#,
    )
    .unwrap();
    let run = dnd(&["report", job.to_str().unwrap()]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("no results yet") && run.stderr.contains("descriptions.parquet"),
        "{}",
        run.stderr
    );

    // An unreadable table.
    std::fs::create_dir_all(job.join("results")).unwrap();
    std::fs::write(job.join("results/descriptions.parquet"), b"PAR1 but not really").unwrap();
    let run = dnd(&["report", job.to_str().unwrap()]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot read the results table")
            && run.stderr.contains("descriptions.parquet"),
        "{}",
        run.stderr
    );
}
