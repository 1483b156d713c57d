"""Central control module: fleet registry, policy, reward."""
