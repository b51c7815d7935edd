"""What the operator, the agent and the kubectl plugin share: the API, their contract, keys, the API client."""
