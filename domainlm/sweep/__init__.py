"""`domainlm sweep`: hyperparameter search over recipe fields with Optuna, each trial one run of
a stage in its own folder under build/<run>/sweep/trials/."""
