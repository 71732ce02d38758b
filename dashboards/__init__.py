"""The Pareto report of a sweep: reads Optuna storage, never trains."""
