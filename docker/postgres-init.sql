-- Run once by the postgres image, when its data volume is first initialised (/docker-entrypoint-initdb.d):
-- MLflow's backend store and Optuna's study storage each get their own database.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
