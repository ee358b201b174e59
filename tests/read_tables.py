"""Opens dnd's tables with pandas, DuckDB and Polars, as a user would, and checks that
every table has its documented columns (docs/schema.md).

Usage: python3 tests/read_tables.py OUT_DIR          (a `dnd probe` output directory)
       python3 tests/read_tables.py --results JOB_DIR (a `dnd dissect` job directory)
Exit codes: 0 ok, 1 a check failed, 3 a reader package is missing.
"""

import os
import re
import sys

try:
    import duckdb
    import pandas as pd
    import polars as pl
except ImportError as e:  # the Rust test decides whether this is fatal (it is under CI)
    print(f"missing Python package: {e.name}; pip install pandas pyarrow duckdb polars", file=sys.stderr)
    sys.exit(3)

TABLES = {
    "topk/*.parquet": ["layer", "neuron", "rank", "image_id", "activation"],
    "errors.parquet": ["image_id", "stage", "reason", "message"],
    "crops/*.parquet": ["layer", "neuron", "rank", "image_id", "image_activation", "crop_index",
                        "canvas_size", "x0", "y0", "x1", "y1", "threshold", "png"],
    # one layer at a time: each layer's vectors have its own width
    "activations/layer4/*.parquet": ["image_id", "activation"],
}


def main(out: str) -> None:
    con = duckdb.connect()
    for pattern, columns in TABLES.items():
        path = os.path.join(out, pattern)
        rel = con.sql(f"SELECT * FROM read_parquet('{path}')")
        assert rel.columns == columns, (pattern, rel.columns)
        n_duck = con.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0]
        frame = pl.read_parquet(path)
        assert frame.columns == columns, (pattern, frame.columns)
        assert frame.height == n_duck, (pattern, frame.height, n_duck)
        print(f"{pattern}: {n_duck} rows, columns ok in DuckDB and Polars")

    top = pd.read_parquet(os.path.join(out, "topk", "layer4.parquet"))
    assert list(top.columns) == TABLES["topk/*.parquet"]
    assert top["rank"].min() == 0
    # The most activating image per neuron, the way an analyst would ask for it.
    best = con.sql(
        f"SELECT neuron, image_id, activation FROM read_parquet('{out}/topk/layer4.parquet') "
        "WHERE rank = 0 ORDER BY activation DESC LIMIT 3").fetchall()
    assert len(best) == 3
    acts = pl.read_parquet(os.path.join(out, "activations", "layer4", "part-00000.parquet"))
    width = acts["activation"].dtype.size
    assert width == 512, acts.schema
    duck_type = con.sql(f"SELECT typeof(activation) FROM read_parquet('{out}/activations/layer4/*.parquet') LIMIT 1").fetchall()[0][0]
    # Parquet itself has no fixed-size list: DuckDB sees a list, Polars (which reads the
    # embedded Arrow schema) a fixed-size Array.
    assert duck_type == "FLOAT[]", duck_type
    assert con.sql(f"SELECT len(activation) FROM read_parquet('{out}/activations/layer4/*.parquet') LIMIT 1").fetchall()[0][0] == 512
    crops = pd.read_parquet(os.path.join(out, "crops", "layer4.parquet"))
    assert crops["png"].iloc[0][:8] == b"\x89PNG\r\n\x1a\n"
    print(f"pandas: {len(top)} top-K rows, {len(crops)} crops; DuckDB reads activations as {duck_type}")


def documented_results():
    """{table: [columns]} from docs/schema.md's `results/<table>.parquet` sections."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "schema.md")).read()
    tables = {}
    for name, body in re.findall(r"### `results/(\w+)\.parquet`\n(.*?)(?=\n### |\n```|\Z)", doc, re.S):
        tables[name] = re.findall(r"^\| `(\w+)` \|", body, re.M)
    return tables


def results(job: str) -> None:
    con = duckdb.connect()
    tables = documented_results()
    assert len(tables) == 8, sorted(tables)
    for name, columns in tables.items():
        path = os.path.join(job, "results", f"{name}.parquet")
        assert con.sql(f"SELECT * FROM read_parquet('{path}')").columns == columns, (name, columns)
        assert pl.read_parquet(path).columns == columns, name
        frame = pd.read_parquet(path)
        assert list(frame.columns) == columns, name
        print(f"results/{name}: {len(frame)} rows, columns ok in DuckDB, Polars and pandas")
    # The question an analyst asks first: every neuron with its label and best scores.
    rows = con.sql(
        f"SELECT d.layer, d.neuron, d.label, s.topk_sq_mean, s.similarity "
        f"FROM read_parquet('{job}/results/descriptions.parquet') d "
        f"JOIN read_parquet('{job}/results/scores.parquet') s USING (layer, neuron) "
        "WHERE s.final_rank = 0 ORDER BY d.layer, d.neuron").fetchall()
    assert rows and all(r[2] for r in rows), rows
    # A job over a dictionary's units: what each unit is, and the descriptions joined to it.
    units = os.path.join(job, "probe", "units")
    if os.path.isdir(units):
        columns = ["layer", "neuron", "unit_kind", "unit_source", "name", "images",
                   "fired_images", "position_share", "firing_rate", "status"]
        for file in sorted(os.listdir(units)):
            path = os.path.join(units, file)
            assert con.sql(f"SELECT * FROM read_parquet('{path}')").columns == columns, path
            assert pl.read_parquet(path).columns == columns, path
            joined = con.sql(
                f"SELECT u.status, d.status FROM read_parquet('{path}') u "
                f"JOIN read_parquet('{job}/results/descriptions.parquet') d "
                "USING (layer, neuron, unit_kind, unit_source)").fetchall()
            assert joined and all(u == d for u, d in joined if u != "active"), joined
            print(f"probe/units/{file}: columns ok, {len(joined)} units joined to their descriptions")


if __name__ == "__main__":
    if sys.argv[1] == "--results":
        results(sys.argv[2])
    else:
        main(sys.argv[1])
