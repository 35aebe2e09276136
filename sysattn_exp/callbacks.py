"""Hydra callbacks: tell the user where the results are once a run or sweep ends."""

from pathlib import Path

from hydra.experimental.callback import Callback

from sysattn_exp.tracking import absolute_uri


def where_results(folder: str, uri: str) -> str:
    return (
        f"\nResults: {Path(folder).resolve()} (metrics.json, predictions.parquet per job)\n"
        f"MLflow UI: mlflow ui --backend-store-uri {absolute_uri(uri)}  (then open http://127.0.0.1:5000)"
    )


class WhereResults(Callback):
    def on_run_end(self, config, **kwargs) -> None:
        if (Path(config.hydra.run.dir) / "metrics.json").exists():
            print(where_results(config.hydra.run.dir, config.tracking.uri))

    def on_multirun_end(self, config, **kwargs) -> None:
        if any(Path(config.hydra.sweep.dir).glob("*/metrics.json")):
            print(where_results(config.hydra.sweep.dir, config.tracking.uri))
