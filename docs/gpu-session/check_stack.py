# Quick check of the carried stack on its own (no project code): mlflow on sqlite, optuna RDB, ray with 0.5-GPU
# tasks running together, a 2-trial Ray Tune + OptunaSearch run.  PYTHONPATH=/tmp/site python3 .gpu/check_stack.py
import os, tempfile, time
d = tempfile.mkdtemp(); os.chdir(d)
import mlflow, optuna, sqlalchemy, pydantic, transformers, huggingface_hub
from mlflow.tracking import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from transformers import MambaConfig, Mamba2Config
mlflow.set_tracking_uri(f"sqlite:///{d}/mlflow.db")
mlflow.set_experiment("x")
with mlflow.start_run():
    mlflow.log_metric("m", 1.0); mlflow.log_param("p", 2)
print("mlflow sqlite ok", MlflowClient().search_runs([mlflow.get_experiment_by_name("x").experiment_id])[0].data.metrics)
st = optuna.create_study(storage=f"sqlite:///{d}/optuna.db", study_name="s", directions=["maximize", "minimize"])
st.optimize(lambda t: (t.suggest_float("a", 0, 1), t.suggest_int("b", 1, 4)), n_trials=3)
print("optuna rdb ok", len(st.trials))
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch
ray.init(num_gpus=1, num_cpus=2, include_dashboard=False, log_to_driver=False)
@ray.remote(num_gpus=0.5)
def f():
    t = time.time(); time.sleep(3); return t, os.getpid()
r = ray.get([f.remote(), f.remote()])
assert abs(r[0][0] - r[1][0]) < 2 and r[0][1] != r[1][1]
print("ray 0.5-GPU tasks concurrent ok")
def trainable(cfg):
    tune.report({"score": cfg["a"]})
res = tune.Tuner(tune.with_resources(trainable, {"cpu": 1, "gpu": 0.5}),
                 param_space={"a": tune.uniform(0, 1)},
                 tune_config=tune.TuneConfig(num_samples=2, metric="score", mode="max", search_alg=OptunaSearch()),
                 run_config=tune.RunConfig(storage_path=d, verbose=0)).fit()
print("tune ok", [x.metrics["score"] for x in res])
ray.shutdown()
print("versions", ray.__version__, mlflow.__version__, optuna.__version__, sqlalchemy.__version__, pydantic.__version__,
      transformers.__version__, huggingface_hub.__version__, ray.__file__)
