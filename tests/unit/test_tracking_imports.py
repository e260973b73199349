"""What the MLflow writer process imports: mlflow without pandas and pyarrow (about 85 MiB
and half a second less per writer), pyarrow for a run whose artifacts are on HDFS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WRITER_IMPORTS = """
import json, sys
from xp._tracking_worker import _client, _import_mlflow, _load_hdfs_support

_import_mlflow()
left_out = [name for name in ("pandas", "pyarrow") if name in sys.modules]
client = _client(sys.argv[1])
run = client.create_run(client.create_experiment("exp")).info.run_id
client.log_artifact(run, sys.argv[2])
client.set_terminated(run, "FINISHED")
hdfs = sys.modules["mlflow.store.artifact.hdfs_artifact_repo"]
before = "HadoopFileSystem" in vars(hdfs)
_load_hdfs_support(client.get_run(run).info.artifact_uri)  # a local store: nothing to do
local = "HadoopFileSystem" in vars(hdfs)
_load_hdfs_support("hdfs://namenode:8020/mlartifacts/1/abc/artifacts")
import pandas  # what asks for it later gets it
print(json.dumps({
    "loaded": left_out, "status": client.get_run(run).info.status,
    "artifacts": [a.path for a in client.list_artifacts(run)],
    "hdfs": [before, local, "HadoopFileSystem" in vars(hdfs)],
}))
"""


def test_the_writer_goes_without_pandas_and_pyarrow_but_hdfs_artifacts_get_pyarrow(
    mlflow_uri: str, tmp_path: Path
) -> None:
    script = tmp_path / "writer_imports.py"
    script.write_text(WRITER_IMPORTS)
    artifact = tmp_path / "config.yaml"
    artifact.write_text("a: 1\n")
    out = subprocess.run(
        [sys.executable, str(script), mlflow_uri, str(artifact)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["loaded"] == []  # mlflow imported without either
    assert result["status"] == "FINISHED" and result["artifacts"] == ["config.yaml"]
    assert result["hdfs"] == [False, False, True]  # pyarrow once a run's artifacts are on HDFS
