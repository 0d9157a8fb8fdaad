"""The rendezvous control protocol: codec, keys and sans-IO client and server cores."""
