from torchopt_ext.cli import main

raise SystemExit(main())
