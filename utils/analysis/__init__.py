"""Analysis of finished runs: result tables (`results`), figures (`plots`), t-SNE (`tsne`)."""
