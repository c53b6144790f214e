from findlady_cli.main import main

raise SystemExit(main())
