"""Small end-to-end problems that the scripts run (data, loss, training loops)."""
