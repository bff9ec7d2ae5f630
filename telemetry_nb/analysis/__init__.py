"""Reading the fleet back: the API client, deployment checks, the canary, exploration and the dashboard."""
