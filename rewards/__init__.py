"""diffalign's built-in reward-model plug-ins (installed as ``diffalign_rewards``).

They register through the ``diffalign.rewards`` entry-point group in ``pyproject.toml`` exactly
as a third-party package would; load them with ``diffalign.rewards.load_reward(name, ...)``.
"""
