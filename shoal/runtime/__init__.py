"""Who am I and who are my peers: the launcher's environment and the device mesh."""
