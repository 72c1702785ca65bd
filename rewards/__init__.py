"""diffalign's built-in reward-model plug-ins (installed as ``diffalign_rewards``).

The plug-ins register through the ``diffalign.rewards`` entry-point group exactly as a
third-party package would; the registry itself is ``diffalign.rewards``.
"""
